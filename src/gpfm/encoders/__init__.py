"""Encoder zoo: published pathology foundation models and tiny random ones, one API (see registry.py)."""

from gpfm.encoders.registry import (
    EncoderRecord,
    WeightSource,
    create_encoder,
    encoder_table,
    get_record,
    list_encoders,
)
from gpfm.encoders.transforms import EncoderTransform

__all__ = ["EncoderRecord", "EncoderTransform", "WeightSource", "create_encoder", "encoder_table", "get_record",
           "list_encoders"]
