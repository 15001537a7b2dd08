"""What people read: `report.html`, the live dashboard and the terminal tables."""
