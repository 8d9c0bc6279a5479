"""The real-guest fixtures (guest kit, KVM lab) for the security tests that boot a guest."""

from tests.realguest.conftest import kit, kvm_lab, qemu  # noqa: F401
