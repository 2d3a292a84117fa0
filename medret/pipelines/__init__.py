"""Jobs composed from the layers: storage -> io -> preprocess -> models -> index."""
