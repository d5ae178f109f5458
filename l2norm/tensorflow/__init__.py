"""The TensorFlow plug-in (Keras' TensorFlow backend). Importing this package imports no
TensorFlow: its modules do."""
