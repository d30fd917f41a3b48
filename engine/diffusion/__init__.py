"""Diffusion models: what differs between model families, SD and SDXL (families: one module each;
nothing else names a pipeline class), where their files are and loading them (models), rendering seeds with a
job's LoRA (sampling), training a LoRA through its phases (training), torch.compile of the UNets
(compiling), and the kohya/ComfyUI LoRA format (kohya).

Stands on the base modules and measure/ (the convergence rule); the stage context a training run
reports to is named for annotations only."""

from engine.diffusion.quiet import drop_third_party_noise

drop_third_party_noise()  # before any module here imports diffusers: see engine.diffusion.quiet
