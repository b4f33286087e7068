"""Simulation: Phase 4a manifest, Phase 4c scenes, realism gates (see docs/simulator.md)."""
