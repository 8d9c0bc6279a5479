"""ACPI for vdm guests: a small AML encoder and the tables (RSDP, XSDT, FADT, MADT, DSDT)."""
