"""Ray: probe fine-tunes, estimation actors, the central optimiser (stages 2-5)."""
