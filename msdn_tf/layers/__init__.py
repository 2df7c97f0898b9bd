"""Custom Keras layers of MSDN: the shared attribute semantics and the two attention sub-nets."""

from msdn_tf.layers.attribute_embedding import AttributeEmbedding
from msdn_tf.layers.attribute_to_visual import AttributeToVisual
from msdn_tf.layers.visual_to_attribute import VisualToAttribute

__all__ = ["AttributeEmbedding", "AttributeToVisual", "VisualToAttribute"]
