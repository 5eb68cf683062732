"""The engine: batched exact and randomized SVD of the matrices a source offers.

``config`` declares how it runs (once per command), ``sources`` what it decomposes,
``needs`` how many top triplets each matrix needs (a fixed rank, an energy target, a rank
policy), ``batches`` the one batch loop, ``exact`` and ``randomized`` the kernels, and
``decompose`` what callers ask for: spectra and factors. Import from the submodules; this
package imports nothing, so ``engine.config`` stays free of torch until it is used.
"""
