"""Client data, from text to round batches, on the host:

    corpus        the embedded corpus (man pages, fortunes, code, literature), checked on read
    tfds_builder  the corpus as a tfds dataset, and loading any tfds text dataset
    federated     documents -> clients (iid / Dirichlet) -> token streams -> round batches
    tokenizer     bytes, or SentencePiece trained on the clients' training text
    pipeline      a topology -> every client's train and validation streams, and a round's
                  sampled slots

Nothing is imported here: `corpus` is read without JAX, tfds or SentencePiece.
The modules' documented functions are stable; their other names are not.
"""
