"""Backdoor mitigations (Neural Cleanse, section 6): unlearning, neuron pruning, input filter."""
