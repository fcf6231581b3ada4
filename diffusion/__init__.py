"""Latent diffusion: noise schedules, training objectives, samplers, guidance, U-Net and text encoder.

Modules are imported explicitly (``from diffusion.samplers import sample_dpmpp_2m``); this package
file imports nothing so that each piece stays cheap to load on its own.
"""
