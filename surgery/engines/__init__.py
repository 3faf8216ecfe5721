"""The edges where models are read and written: `live` (a loaded Keras model), `archive` (a
`.keras` file, without TensorFlow), and the Keras pieces they install (`constraint`,
`batchnorm`, `schedule`). Importing this package imports none of them."""

# MODEL names a model built by keras.applications (weights=None) when it starts with this, whatever
# files the folder holds: engines.live builds it, and the command line hashes no file for it.
APPLICATIONS_PREFIX = "keras.applications."
