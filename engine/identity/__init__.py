"""Faces and identity: finding and embedding faces (faces: insightface's ArcFace), the second
identity model (second), 106-point landmarks and the face regions drawn from them (landmarks,
regions), how much of a face a mask hides (coverage), the background remover (background), and
zero-shot identity through IP-Adapter FaceID (faceid).

Stands on the base modules, measure/ and diffusion/ (FaceID adds its adapter to a diffusion
pipeline); knows nothing of jobs, stages or records."""
