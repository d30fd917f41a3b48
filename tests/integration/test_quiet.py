"""A job prints nothing on stderr but the engine's own JSON log lines (issue 36: every demo job
printed transformers' torchvision fallback, its "Token indices sequence length ... (94 > 77)",
diffusers' "No LoRA keys associated to CLIPTextModel" and insightface's FutureWarning). Each is
dropped where it is raised (engine.diffusion.quiet, engine.identity.faces); these tests run the
real calls that raise them, in a fresh process (the notices come once per process, and pytest's
own warning filters must not stand in for the engine's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.paths import REPO

# The calls a job makes, each raising one of the four notices without its filter, on the demo
# model: import diffusers' pipelines (transformers' torchvision fallback), load a LoRA of the UNet
# alone through the render stages' own call (diffusers' "No LoRA keys"), render one step with
# config.toml's default negative prompt (the demo tokenizer splits it into more than 77 tokens),
# embed a face (insightface's FutureWarning). Then one notice of each library logger that is not
# noise, which must still be printed.
_CALLS = r"""
import logging, sys
from pathlib import Path

import numpy as np
from peft import LoraConfig
from skimage import data

from engine.config import Settings
from engine.diffusion.models import load_pipeline, resolve_model
from engine.diffusion.sampling import identity_lora, render
from engine.diffusion.training import ADAPTER, TARGET_MODULES, save_lora
from engine.identity.faces import embed_faces, load_face_models

models, scratch = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings.from_table({"paths": {"models": str(models)}}, root=scratch)
pipe = load_pipeline(resolve_model("demo", "", settings, demo=True), settings)
negative = settings.render.negative_prompt
assert len(pipe.tokenizer.tokenize(negative)) > pipe.tokenizer.model_max_length, "the demo tokenizer no longer truncates it"
pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGET_MODULES), adapter_name=ADAPTER)
save_lora(pipe, pipe.unet, scratch / "lora", 4.0)
pipe.unet.delete_adapters(ADAPTER)
pipe.tokenizer = type(pipe.tokenizer).from_pretrained(str(models / "demo" / "tokenizer"))  # a fresh one: it warns once per tokenizer
with identity_lora(pipe, scratch / "lora"):
    render(pipe, "portrait", negative, [0], steps=1, guidance=5.0, size=64)
faces = load_face_models(Path("/nonexistent-models"), "buffalo_l")
assert len(embed_faces(faces, data.astronaut())) == 1
logging.getLogger("transformers.tokenization_utils_base").warning("a notice that is not noise: tokenizer")
logging.getLogger("diffusers.loaders.lora_base").warning("a notice that is not noise: lora")
logging.getLogger("transformers.utils.import_utils").warning("a notice that is not noise: import")
"""


def _foreign_lines(stderr: str) -> list[str]:
    """Lines of stderr that are not one of the engine's JSON log lines."""
    foreign = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and "event" in record):
            foreign.append(line)
    return foreign


def test_the_tokenizer_and_lora_notices_are_dropped_and_no_other(tmp_path, shared_models):
    """In this process (~1 s once torch and diffusers are imported): a render on the demo model with
    config.toml's default negative prompt, its LoRA loaded by the render stages' own call. The
    handler sits on the libraries' own loggers, behind the filters and ahead of their output."""
    import logging

    from peft import LoraConfig

    from engine.config import Settings
    from engine.diffusion.models import load_pipeline, resolve_model
    from engine.diffusion.sampling import identity_lora, render
    from engine.diffusion.training import ADAPTER, TARGET_MODULES, save_lora

    settings = Settings.from_table({"paths": {"models": str(shared_models)}}, root=tmp_path)
    pipe = load_pipeline(resolve_model("demo", "", settings, demo=True), settings)
    pipe.tokenizer = type(pipe.tokenizer).from_pretrained(str(shared_models / "demo" / "tokenizer"))  # it warns once per tokenizer
    negative = settings.render.negative_prompt
    assert len(pipe.tokenizer.tokenize(negative)) > pipe.tokenizer.model_max_length  # the demo tokenizer truncates it
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGET_MODULES), adapter_name=ADAPTER)
    save_lora(pipe, pipe.unet, tmp_path / "lora", 4.0)
    pipe.unet.delete_adapters(ADAPTER)
    pipe.tokenizer = type(pipe.tokenizer).from_pretrained(str(shared_models / "demo" / "tokenizer"))

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    kept = Kept()
    loggers = [logging.getLogger(name) for name in ("transformers.tokenization_utils_base", "diffusers.loaders.lora_base")]
    for logger in loggers:
        logger.addHandler(kept)
    try:
        with identity_lora(pipe, tmp_path / "lora"):
            render(pipe, "portrait", negative, [0], steps=1, guidance=5.0, size=64)
        assert kept.messages == []
        for logger in loggers:
            logger.warning("a notice that is not noise")
        assert kept.messages == ["a notice that is not noise"] * 2
    finally:
        for logger in loggers:
            logger.removeHandler(kept)


@pytest.mark.slow  # a fresh process importing torch, diffusers, peft and insightface: ~7 s on a loaded 2-core machine
def test_the_libraries_notices_are_dropped_where_they_are_raised_and_no_other(tmp_path, shared_models):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _CALLS, str(shared_models), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # structlog is not configured in this process (the CLIs do that): its lines go to stdout.
    assert _foreign_lines(done.stderr) == [
        "[transformers] a notice that is not noise: tokenizer",
        "a notice that is not noise: lora",
        "[transformers] a notice that is not noise: import",
    ], done.stderr


@pytest.mark.slow  # a whole demo job: ~25 s on a 2-core CPU (the demo model built first, as on a fresh clone)
def test_a_demo_job_prints_only_the_engines_own_log_lines(tmp_path):
    from engine.example import write_example_subject

    source = write_example_subject(tmp_path / "examples" / "astronaut")
    config = tmp_path / "config.toml"
    (tmp_path / "models").mkdir()
    config.write_text(f'[paths]\nmodels = "{tmp_path / "models"}"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    done = subprocess.run([sys.executable, "-m", "engine", "--config", str(config), "run", str(source), "--outbox", str(tmp_path / "outbox"), "--demo"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout)["outcome"] == "finished"
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert {"demo_model_built", "pipeline_loaded", "job_finished"} <= set(events)  # the whole job ran, the model built here
    assert _foreign_lines(done.stderr) == [], done.stderr
