"""Trainer for the codec's AutoencoderKL: `accelerate launch -m training --config FILE [section.key=value ...]`."""
