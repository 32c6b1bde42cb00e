"""Real vs generated: a held-out study beside an image generated from its impression, the generated image's nearest
real training images (memorisation), and the real-trained classifier's scores for both."""

from __future__ import annotations

import streamlit as st

from app import common
from tasks.browse.compare import classifier_scores, nearest_training, real_classifier_dir, training_images
from tasks.browse.explore import images as pixels
from tasks.browse.generators import generate_grid
from tasks.generators.conditions import study_conditions

NEAREST = 4


def page(context: common.Context) -> None:
    study = common.held_out_study(context, "Held-out study", "study")
    if study is None:
        return
    st.caption(f"Impression: {study.impression}")
    chosen, section = common.generator_picker(context, "compare")
    seed = int(st.number_input("Seed", 0, 2**31 - 1, 0, key="compare_seed"))
    if st.button("Generate from its impression", key="compare", type="primary"):
        classifier = real_classifier_dir(context.config, context.data_root)
        model = common.generator(context, chosen, section)
        with st.spinner("decoding, then looking for the nearest training images ..."):
            # The study's labels and image too: what a label or reference family draws from.
            conditions = study_conditions(context.data_root, [study.study_id], context.config.ingest.resolution)
            generated, provenance = generate_grid(model, study.impression, [seed], conditions)
            real = pixels(context.data_root, context.config.ingest.resolution, [study.dicom_id])[0]
            train_ids, train = training_images(context.data_root, context.config.ingest.resolution)
            nearest, distances = nearest_training(generated[0], train, classifier, NEAREST)
            scores = classifier_scores(classifier, {"real": real, "generated": generated[0]})
        st.session_state["comparison"] = (study.dicom_id, real, generated[0], provenance[0],
                                          train[nearest], [train_ids[i] for i in nearest], distances, scores)
    if st.session_state.get("comparison", (None,))[0] == study.dicom_id:
        _, real, generated, provenance, near, near_ids, distances, scores = st.session_state["comparison"]
        common.show_images([real, generated], [f"real {study.dicom_id[:17]}", f"generated, seed {provenance['seed']}"],
                           context.enhancement, columns=2)
        st.subheader("Nearest real training images of the generated one")
        common.show_images(near, [f"{dicom_id[:17]} · d={distance:.3g}" for dicom_id, distance in zip(near_ids,
                                                                                                      distances)],
                           context.enhancement, columns=NEAREST)
        st.subheader("The real-trained classifier's scores")
        st.dataframe(scores.style.format("{:.3f}"))
