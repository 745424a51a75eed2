"""Tokenizers: the model's own, one named by ``model.tokenizer``, or the built-in byte-level one."""

from __future__ import annotations

from fitune.errors import ModelSourceError


def load_tokenizer(source, config):
    """Load the tokenizer for a resolved source and check that its ids fit the model's embedding."""
    if source.tokenizer_source is None:
        from fitune.models.byte_tokenizer import byte_tokenizer

        tok = byte_tokenizer()
        what = "the built-in byte-level tokenizer"
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source.tokenizer_source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelSourceError(
                f"cannot load the tokenizer from {source.tokenizer_source}: {exc}"
            ) from None
        what = f"the tokenizer of {source.tokenizer_source}"
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ModelSourceError(
            f"{what} has {len(tok)} tokens but the model's vocab_size is {vocab}; fix: set vocab_size >= "
            f"{len(tok)} in the model config, or name a matching tokenizer in model.tokenizer"
        )
    if tok.pad_token_id is None:
        # padding is masked by position (see fitune.data), so reusing eos as the pad id is safe here
        tok.pad_token = tok.eos_token
    return tok
