"""Steps 04-05 and one counterfactual (paper §4.2, §5.1): the BiomedJourney model and its training.

configs     the model sizes: SD v1.5 (paper) and the demo literals
pipeline    BiomedJourneyPipeline: InstructPix2Pix-style latent diffusion from diffusers parts
encoders    the frozen text tower and autoencoder (BiomedCLIP / SD VAE, or the demo's own)
latents     the on-disk cache of frozen-encoder outputs
train       the training loop through accelerate
stages      the two training stages as notebooks 04-05 and `launch` run them
demo_model  the shipped demo model
generate    `bmj generate`
launch      multi-GPU training outside Jupyter
"""
