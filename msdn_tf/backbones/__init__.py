"""Image backbones: torchvision-layout ResNet in Keras and the reference preprocessing.

* :mod:`msdn_tf.backbones.torchvision_resnet`: the ResNet-101 trunk of the reference
  features, weights read from torchvision or MSDN ``.pth`` files without torch.
* :mod:`msdn_tf.backbones.preprocessing`: PIL/torchvision preprocessing, bit-exact in
  numpy (extraction) and in-graph TensorFlow (serving).
"""
