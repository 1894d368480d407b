"""`moeport verify`: check a conversion against its source, tensor by tensor, streaming."""
