"""Background removal with rembg, from a model staged in <models>/rembg/ only.

rembg would download a missing model from the internet (and, offline, fail only after
~55 s). So the staged file is checked first, and rembg is handed exactly that file
through its custom U2-Net session; `download_models` is the session class's hook for
locating weights and here it only ever returns the staged path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.hashcache import sha256_of


def staged_model_path(models_dir: Path, model: str) -> Path:
    """Where the rembg model `model` must be staged."""
    return models_dir / "rembg" / f"{model}.onnx"


class BackgroundRemover:
    """A rembg session on a staged U2-Net-family ONNX file (1x3x320x320 in, mask out)."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        import onnxruntime
        from rembg.sessions.u2net_custom import U2netCustomSession

        staged = Path(model_path).resolve()

        class _StagedSession(U2netCustomSession):
            @classmethod
            def download_models(cls, *args: object, **kwargs: object) -> str:
                return str(staged)

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.model_path = staged
        self.sha256 = sha256_of(staged)
        self._session = _StagedSession("u2net_custom", options, model_path=str(staged), providers=["CPUExecutionProvider"])

    def alpha(self, rgb: np.ndarray) -> np.ndarray:
        """Foreground matte of an RGB image: H x W uint8, 255 = keep."""
        from PIL import Image
        from rembg import remove

        mask = remove(Image.fromarray(rgb), session=self._session, only_mask=True, post_process_mask=False)
        return np.asarray(mask.convert("L"), dtype=np.uint8)
