"""One thin adapter per stage notebook, found by the stage's name: `s01_data`, `s02_training`,
`s03_gradnorms`, `s04_bias`, `s05_results`. Each gives its notebook `context(globals())` and the
one call per cell into the science modules; the notebook shows what the call returns."""
