"""A tokenizer for synthetic models, so that a server over one streams text as a real one does.

Synthetic models have random weights and no tokenizer: their server can neither size prompts
nor stream text. This one covers the model's whole vocabulary: text is split into pieces of one
or two characters (lowercase letters and space, the alphabet of the benchmark's random words),
each piece one token, so an N-token prompt is exact and its ids vary with the text; the other
ids are placeholder tokens `<id>`. Decoding concatenates the pieces, so text -> ids -> text is
the identity and every generated token adds text to a stream.
"""

from __future__ import annotations

import json
import os
import string

UNKNOWN = "[UNK]"


def write_synthetic_tokenizer(path: str, vocab_size: int) -> str:
    """Writes tokenizer.json (and a tokenizer_config.json) for a vocabulary of `vocab_size`
    ids into the directory `path`; returns it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = string.ascii_lowercase + " "
    pieces = [UNKNOWN, *alphabet, *(a + b for a in alphabet for b in alphabet)]
    if vocab_size < len(pieces):
        raise ValueError(f"a synthetic tokenizer needs a vocabulary of at least {len(pieces)} "
                         f"ids, got {vocab_size}")
    vocab = {piece: index for index, piece in enumerate(pieces)}
    vocab.update({f"<{index}>": index for index in range(len(pieces), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(".{1,2}"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}, f)
    return path
