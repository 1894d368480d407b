"""Model families as data: names, config fields and key templates. A new model is a new entry."""

from moeport.zoo.families import FAMILIES, ExpertLayout, Family, family_for_model_type
from moeport.zoo.model_config import ModelConfig

__all__ = ["FAMILIES", "ExpertLayout", "Family", "ModelConfig", "family_for_model_type"]
