"""Training: the trainer (`trainer`), its phases (`phases`) and hyperparameter search (`tuning`)."""

from cifarflow.serving import import_tensorflow_quietly

import_tensorflow_quietly()  # before Keras: TensorFlow's C++ start-up lines stay out of the terminal
