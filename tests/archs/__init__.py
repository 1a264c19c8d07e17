"""Architecture modules defined outside the package, registered by the tests that use them."""
