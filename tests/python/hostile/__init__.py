"""The hostile suite: a package, so that its shared server lives only while its tests run."""
