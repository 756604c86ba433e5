"""One file per model family: the dense GQA decoder with MSA (`msa.py`, learned or derived
indexer), MiniMax-M3 (`minimax_m3.py`) and their vision towers."""
