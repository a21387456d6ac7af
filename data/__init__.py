"""Training data: image folders with captions -> a pre-encoded latent cache (VAE moments, prompt embeddings) -> batches.

    report = encode_dataset("photos/", "cache/", "model.safetensors", resolution=512, bucket=True, flip=True)
    loader = LatentLoader("cache/", batch_size=4, seed=0)
    for batch in loader.iterate(start_step=0): ...   # batch.latents are sampled and scaled; batch.context if stored
    # SDXL: also batch.pooled and batch.size_conditioning (each image's original size, crop, target), for y

Command line: `python -m data.encode --help`.
"""
import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

from .buckets import Geometry, Placement, bucket_sizes, nearest_bucket, own_bucket, parse_resolution, place
from .cache import CacheItem, CacheMismatchError, DataError, LatentCache
from .images import BadImage, image_size, load_rgb, sha256_file
from .loader import Batch, LatentLoader, sample_latents
from .pipeline import EncodeConfig, EncodeReport, encode_dataset, model_hash
from .sources import ImageSource

__all__ = [
    "encode_dataset", "EncodeConfig", "EncodeReport", "model_hash", "ImageSource",
    "LatentCache", "CacheItem", "LatentLoader", "Batch", "sample_latents",
    "DataError", "CacheMismatchError", "BadImage",
    "Geometry", "Placement", "bucket_sizes", "nearest_bucket", "own_bucket", "parse_resolution", "place",
    "load_rgb", "image_size", "sha256_file",
]
