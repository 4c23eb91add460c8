"""The Ray pipeline (docs/design.md §1): LM shard actors stream activation chunks, with a bound on the chunks
in flight, to trainers that see them as one ordinary activation source.

Chunk j of the stream is the j-th batch of `model.batch_contexts` contexts; producer i of N computes the
chunks with j % N == i. A consumer asks for chunks by number, so the stream it sees is the same as the
single-process LM source's, whatever the number of producers, restarts or retries.
"""
