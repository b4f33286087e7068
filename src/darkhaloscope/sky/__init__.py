"""The real sky: DR10 cutouts of a catalogue (``dhs cutouts``) and recall on real known lenses (``dhs recall``)."""
