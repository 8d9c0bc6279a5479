"""The real-guest fixtures (guest kit, KVM lab), shared from tests/realguest for the KVM tests."""

from tests.realguest.conftest import kit, kvm_lab, qemu  # noqa: F401
