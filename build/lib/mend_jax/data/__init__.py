"""Edit data: records to fixed-shape batches (`batches`) and the paper's official file formats
(`official`: zsRE, FEVER, Wikitext self-samples, NQ, held-out text)."""

from mend_jax.data import batches, official
from mend_jax.data.batches import IGNORE, EditData, Tokenized, read_positions

__all__ = ["batches", "official", "IGNORE", "EditData", "Tokenized", "read_positions"]
