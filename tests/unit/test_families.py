"""Model families (issue 33): what differs between SD and SDXL is owned by one module per family
in engine/diffusion/families/, and nothing else in engine/ branches on a pipeline's class name.

The look-ups are checked on plain data (model_index.json contents, tensor names): nothing here
builds or loads a model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.diffusion.families import FAMILIES, family_named, family_of, family_of_checkpoint, index_classes
from tests.harness.paths import REPO

FAMILIES_DIR = REPO / "engine" / "diffusion" / "families"
# What only a family module may say: pipeline class names, SDXL's second encoder and its added
# conditioning, and class-name tests on a pipeline.
FAMILY_WORDS = re.compile(r"StableDiffusion\w*Pipeline|XLPipeline|text_encoder_2|tokenizer_2|add_time_ids|time_ids|"
                          r"AutoPipelineFor\w+|\)\.__name__\s*(?:==|!=|\bin\b)|isinstance\([^)]*Pipeline")


def _family_words(root: Path, skip: Path | None = None) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if skip is not None and skip in path.parents:
            continue
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if FAMILY_WORDS.search(line):
                found.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return found


def test_nothing_outside_the_families_names_a_pipeline_class_or_sdxls_conditioning():
    assert _family_words(REPO / "engine", skip=FAMILIES_DIR) == []
    assert _family_words(FAMILIES_DIR.parent)  # the families themselves do: the pattern finds what it looks for


@pytest.mark.parametrize("planted", ['if type(pipe).__name__ == "StableDiffusionXLPipeline":',
                                     "if isinstance(pipe, StableDiffusionXLPipeline):",
                                     'kwargs["added_cond_kwargs"] = {"time_ids": add_time_ids}',
                                     "encoder = pipe.text_encoder_2"])
def test_the_check_finds_a_planted_class_name_test(tmp_path, planted):
    engine = tmp_path / "engine"
    (engine / "stages").mkdir(parents=True)
    (engine / "stages" / "planted.py").write_text(f"def run(pipe):\n    {planted}\n        pass\n")
    assert len(_family_words(engine)) == 1


def test_each_family_is_found_from_its_index_its_checkpoints_and_its_name():
    assert [family.name for family in FAMILIES] == ["sd", "sdxl"]
    for family in FAMILIES:
        assert family_named(family.name) is family
        for class_name in family.index_classes:
            assert family_of({"_class_name": class_name}) is family
        assert family.inpaint_channels == 9 and family.guidance_kwargs(5.8) == {"guidance_scale": 5.8}
    assert family_of_checkpoint(["model.diffusion_model.out.2.bias", "cond_stage_model.transformer.x"]).name == "sd"
    assert family_of_checkpoint(["model.diffusion_model.out.2.bias", "conditioner.embedders.1.model.ln_final.bias"]).name == "sdxl"
    assert {"text_encoder_2", "tokenizer_2"} <= set(family_named("sdxl").components) and "text_encoder_2" not in family_named("sd").components
    assert index_classes()[0] == "StableDiffusionPipeline"
    with pytest.raises(ValueError, match="'KandinskyPipeline'; supported: StableDiffusionPipeline"):
        family_of({"_class_name": "KandinskyPipeline"})
    with pytest.raises(ValueError, match="unknown model family 'flux'; known: sd, sdxl"):
        family_named("flux")
    with pytest.raises(ValueError, match="a object is of no known model family"):
        family_of(object())


def test_a_folder_is_checked_for_its_familys_components(tmp_path):
    """`models check` and the start-up check refuse an SDXL folder whose model_index.json lists no
    second text encoder, naming the file and what the family needs (no weights are read)."""
    import json

    from engine.config import Settings
    from engine.diffusion.models import resolve_model
    from engine.errors import ConfigError

    folder = tmp_path / "models" / "xl"
    folder.mkdir(parents=True)
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": [None, None], "tokenizer_2": [None, None],
             **{name: ["diffusers", "X"] for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}}
    (folder / "model_index.json").write_text(json.dumps(index))
    settings = Settings.from_table({"paths": {"models": str(tmp_path / "models")}}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"models\.base: .*xl/model_index\.json lists no text_encoder_2, tokenizer_2; an SDXL pipeline") as refused:
        resolve_model("xl", "", settings, demo=False)
    assert refused.value.code == "model_invalid"
    # The same index as SD's family lacks nothing: what is checked next is its component folders.
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="is incomplete, missing .*unet/"):
        resolve_model("xl", "", settings, demo=False)
