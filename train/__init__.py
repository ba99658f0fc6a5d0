from train import log_filters

log_filters.install()  # before any diffusers model is cast: see train/log_filters.py
