"""Reading the crashed kernel's ELF core: headers, notes, VMCOREINFO and physical memory."""
