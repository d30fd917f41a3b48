"""Notices the diffusion libraries print on every job that say nothing a lab can act on, dropped
where each is logged: one message of one library logger each, matched by its own words, so that
anything else those loggers say still reaches stderr (issue 36: a demo job printed four of them
between the engine's own JSON lines). The other libraries' progress bars are turned off in
engine.diffusion.models (`_quiet_libraries`); insightface's deprecation warning is filtered in
engine.identity.faces, beside the call that raises it.

Installed when engine.diffusion is imported (its __init__), before any module of ours imports
diffusers: transformers prints the first of these while diffusers' pipelines are being imported.
A plain `logging` filter on the library's own logger: nothing of transformers or diffusers is
imported here."""

from __future__ import annotations

import logging
import re

# (logger, the start of the message as a regex), each with why it is noise
NOISE: tuple[tuple[str, str], ...] = (
    # transformers 5 names image processors that need torchvision; diffusers' pipeline modules
    # import CLIP's and SigLIP's, and transformers falls back to their PIL twins with this line.
    # No image processor runs in a job (the safety checker and feature extractor are left out).
    ("transformers.utils.import_utils", r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"),
    # diffusers' textual-inversion check (maybe_convert_prompt) splits the whole prompt into tokens
    # before the prompt is encoded; only that split is longer than model_max_length, and the
    # encoding itself truncates to it (77 for CLIP) as it always did. The demo model's byte-level
    # tokenizer splits config.toml's default negative prompt into 94 tokens, so every demo job
    # printed "will result in indexing errors", which never happens. No tokenizer setting silences
    # it (it reads the call's own `verbose`), and cutting the prompt's text beforehand would change
    # what a real BPE tokenizer encodes where a word is cut.
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the specified maximum sequence length"),
    # The engine's LoRAs are the UNet's alone (engine.diffusion.training trains no text encoder);
    # loading one into a pipeline looks for text-encoder keys and says it found none.
    ("diffusers.loaders.lora_base", r"No LoRA keys associated to CLIPTextModel(WithProjection)? found with the prefix='text_encoder(_2)?'"),
)


class DropNotice(logging.Filter):
    """Drops the records of one logger whose message starts with `pattern` (a regex)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def drop_third_party_noise() -> None:
    """Install the filters of NOISE (once: calling again adds nothing)."""
    for logger_name, pattern in NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DropNotice) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropNotice(pattern))
