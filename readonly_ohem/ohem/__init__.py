"""Online hard example mining: OHEMDataLayer, mining policies, selection records."""
