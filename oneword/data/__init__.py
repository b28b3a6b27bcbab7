"""Reading users' reference images: robust loading, validation and the crops fed to the VAE."""
