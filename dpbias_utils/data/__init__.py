"""Stage 01's science: the word lists (`lexicon`), counterfactual data augmentation (`cda`), the
controlled stereotype corpus and text loading (`corpus`), and the privacy units written for stages
02-04 (`units`: chunking, CDA at a mixing ratio, mechanism splits, the stage-01 files)."""
