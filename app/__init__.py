"""The Streamlit app over a run's stores (`augment app --config configs/demo.yaml`): generate, presets, real vs
generated, the dataset explorer, results. Pages only: what they show comes from plain functions in tasks/."""
