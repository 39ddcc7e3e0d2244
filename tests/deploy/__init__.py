"""Deployment checks: the Dockerfile, docker-compose files and Kubernetes manifests, offline."""
