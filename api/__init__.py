"""The REST front end. Never imports torch: specs are validated with `dopsd.config`, images with `dopsd.data`."""
