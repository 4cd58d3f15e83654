"""Data: load CIFAR-10-style datasets into arrays (`datasets`) and feed them to Keras as tf.data batches (`pipeline`)."""
