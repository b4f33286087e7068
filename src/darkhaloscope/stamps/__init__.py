"""Stamps: the Phase 4c data contract, the stamp codec and the one reader of a Phase 4c dataset."""
