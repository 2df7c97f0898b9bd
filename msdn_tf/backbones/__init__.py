"""Image backbones: torchvision-layout ResNet in Keras and the reference preprocessing.

* :mod:`msdn_tf.backbones.torchvision_resnet`: the ResNet-101 trunk of the reference
  features, weights read from torchvision or MSDN ``.pth`` files without torch.
* :mod:`msdn_tf.backbones.preprocessing`: PIL/torchvision preprocessing, bit-exact in
  numpy (extraction) and in-graph TensorFlow (serving).
* :mod:`msdn_tf.backbones.keras_resnet`: ``keras.applications.ResNet101`` (not the
  reference features), TF image decoding and the Resize/CenterCrop shared by the Keras
  extraction path, visualisation and the ``serving_images`` signature.
* :mod:`msdn_tf.backbones.verify`: a check of both extraction paths against saved
  torchvision outputs.
"""
