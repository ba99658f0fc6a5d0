from manifests import log_filters

log_filters.drop(log_filters.EMPTY_FP32_MODULES)  # before any diffusers model is cast: see manifests/log_filters.py
