"""medret: distributed batch indexing and Hamming search for medical image retrieval."""

__version__ = "0.1.0"
