"""The crashed kernel's memory map: struct page layout, mem_section walk, page classes."""
