"""C2PA Content Credentials in every image the engine generates (c2pa-python).

Each PNG of seed discovery and rendering carries, inside the file, a manifest signed with the
lab's content-signer certificate (engine.provenance.trust): a `c2pa.actions` assertion saying it was
created by a trained model (digitalSourceType trainedAlgorithmicMedia, the marking the EU AI
Act's duty for synthetic images points to), the job's input photos as `inputTo` ingredients,
and our own assertion (`org.idrep.generation`: job id, seed, pass, drift, lock state, the base
model's and the LoRA's sha256). The PNG text chunks stay as they were. Offline: no timestamp
authority, no remote manifest or OCSP fetch; thumbnails off (they add ~0.3 MB an image).

A reader (engine.provenance.verification.read_credentials) must ask for the validation state "Trusted" against the lab CA (`trust.user_anchors`):
"Valid" only means the manifest is intact and signed by someone, not by the lab (FINDINGS).
Signatures are randomised (ECDSA, new instance ids): a resumed job's images differ from a clean
run's in their credentials only.

The engine holds no private key (engine.provenance.signer): c2pa builds each claim here and calls back for
its signature (`Signer.from_callback`, ES256, the DER signature c2pa expects from a callback:
checked to validate "Trusted"), which the signer makes for a job in progress only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import c2pa

from engine.provenance.trust import LabKeys

# (job id, outbox, to-be-signed bytes) -> the DER ES256 signature: the signer's `content_signature`
SignContent = Callable[[str, Path, bytes], bytes]

ASSERTION_LABEL = "org.idrep.generation"
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CLAIM_GENERATOR = "identity-replication-daemon"
# Offline, and no thumbnails (FINDINGS: 4 ms and +3.9 KB a 768 px image without, 96 ms and +325 KB with).
SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("identity-replication-daemon")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class ContentCredentials:
    """Signs PNG bytes with the lab's content signer (through `sign`, the signer process's
    `content_signature`); one per engine."""

    def __init__(self, chain_pem: bytes, sign: SignContent) -> None:
        self._chain = chain_pem.decode("ascii")
        self._sign = sign
        self._context = c2pa.Context.from_dict(SETTINGS)
        self._generator = [{"name": CLAIM_GENERATOR, "version": _version()}]

    @classmethod
    def holding(cls, keys: LabKeys) -> "ContentCredentials":
        """Credentials signed in this process with `keys`: for tools and tests that hold a key
        themselves. The engine never does (engine.provenance.signer)."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(keys.signer_key_pem, password=None)
        return cls(keys.signer_chain_pem, lambda _job_id, _outbox, data: key.sign(data, ec.ECDSA(hashes.SHA256())))

    def sign_png(self, png: bytes, *, title: str, facts: dict[str, Any], ingredients: list[tuple[str, Path]], job_dir: Path) -> bytes:
        """`png` with a signed manifest: created by a trained model, from `ingredients` ((name,
        path) of the job's input photos), with `facts` as our assertion; `job_dir` the job's work
        folder (<outbox>/.work/<job-id>), whose job the signer signs for."""
        job_dir = Path(job_dir)
        manifest = {
            "claim_generator_info": self._generator,
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]}},
                {"label": ASSERTION_LABEL, "data": facts},
            ],
        }
        builder = c2pa.Builder(manifest, self._context)
        for name, path in ingredients:
            with open(path, "rb") as photo:
                builder.add_ingredient({"title": name, "relationship": "inputTo"}, _mime(path), photo)
        signed = io.BytesIO()
        with c2pa.Signer.from_callback(lambda data: self._sign(job_dir.name, job_dir.parent.parent, bytes(data)),
                                       c2pa.C2paSigningAlg.ES256, self._chain, None) as signer:
            builder.sign(signer, "image/png", io.BytesIO(png), signed)
        return signed.getvalue()


def _mime(path: Path) -> str:
    """The ingredient's type, from its bytes (the job's photos are jpg, png or webp: engine.images)."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"

