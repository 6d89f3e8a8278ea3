"""Ray, Ray Tune/Optuna and MLflow live here and nowhere else in kdray (docs/architecture.md,
"Layers and layout")."""
